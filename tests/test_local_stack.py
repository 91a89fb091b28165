"""The local stack as an operator runs it: ``infrastructure/local-stack.sh`` with
authentication on, started twice, stopped and started again.
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, _free_port

pytestmark = pytest.mark.integration
SCRIPT = REPO / "infrastructure" / "local-stack.sh"
SERVICES = ("s3", "mlflow", "prefect", "worker")
#: what a caller's environment may carry that the stack must not take over
FOREIGN = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "PREFECT_API_URL",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_AUTH_STRING",
    "PREFECT_HOME",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)


def _script(env: dict, command: str) -> str:
    done = subprocess.run(
        ["bash", str(SCRIPT), command], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _exports(env: dict) -> dict[str, str]:
    """What ``local-stack.sh env`` tells a shell, as a dict."""
    values = {}
    for line in _script(env, "env").splitlines():
        for word in shlex.split(line.removeprefix("export ")):
            name, _, value = word.partition("=")
            values[name] = value
    return values


def _groups(state: Path) -> dict[str, int]:
    return {
        name: int((state / f"{name}.pid").read_text())
        for name in SERVICES
        if (state / f"{name}.pid").exists()
    }


def _alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """The stack on free ports with its state in a temporary folder; stopped at the end."""
    state = tmp_path_factory.mktemp("stack")
    ports = {"S3_PORT": _free_port(), "MLFLOW_PORT": _free_port(), "PREFECT_PORT": _free_port()}
    env = {k: v for k, v in os.environ.items() if k not in FOREIGN}
    env.update(
        {k: str(v) for k, v in ports.items()},
        STACK_STATE=str(state),
        VENV=str(Path(sys.executable).parent.parent),
        STACK_TIMEOUT="300",
        POOL="stack-test",
    )
    first = _script(env, "start")
    try:
        yield {"env": env, "state": state, "ports": ports, "first_start": first}
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=300)


def test_start_twice_runs_each_service_once(stack):
    """A second ``start`` finds everything running and starts nothing."""
    groups = _groups(stack["state"])
    assert set(groups) == set(SERVICES) and all(_alive(g) for g in groups.values())
    again = _script(stack["env"], "start")
    for name in SERVICES:
        assert f"{name} already running" in again
    assert _groups(stack["state"]) == groups
    cfg = _exports(stack["env"])
    for name in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        assert cfg[name] and cfg[name] not in stack["first_start"] + again  # start never says


def test_env_and_status_know_the_running_stacks_ports(stack):
    """A shell without the custom ports gets the running stack's, not the defaults."""
    plain = {k: v for k, v in stack["env"].items() if k not in stack["ports"]}
    cfg = _exports(plain)
    assert cfg["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{stack['ports']['S3_PORT']}"
    assert cfg["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{stack['ports']['MLFLOW_PORT']}"
    assert cfg["PREFECT_API_URL"] == f"http://127.0.0.1:{stack['ports']['PREFECT_PORT']}/api"
    status = _script(plain, "status")
    for name, key in (("s3", "S3_PORT"), ("mlflow", "MLFLOW_PORT"), ("prefect", "PREFECT_PORT")):
        assert f"{name} running" in status and f"127.0.0.1:{stack['ports'][key]}" in status


def test_every_api_refuses_strangers_and_serves_the_stack(stack):
    """Prefect, MLflow and S3: refused without the stack's credentials, served with them."""
    import boto3
    import botocore
    import httpx

    cfg = _exports(stack["env"])
    flows = f"{cfg['PREFECT_API_URL']}/flows/filter"
    assert httpx.post(flows, timeout=30).status_code == 401
    user, _, password = cfg["PREFECT_API_AUTH_STRING"].partition(":")
    assert httpx.post(flows, auth=(user, password), timeout=30).status_code == 200

    search = f"{cfg['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert httpx.get(search, timeout=30).status_code == 401
    assert httpx.get(search, auth=("admin", "wrong"), timeout=30).status_code == 401
    admin = (cfg["MLFLOW_TRACKING_USERNAME"], cfg["MLFLOW_TRACKING_PASSWORD"])
    assert httpx.get(search, auth=admin, timeout=30).status_code == 200

    assert httpx.get(f"{cfg['AWS_ENDPOINT_URL']}/specdeepmap", timeout=30).status_code == 403
    s3 = lambda secret: boto3.client(  # noqa: E731
        "s3",
        endpoint_url=cfg["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=cfg["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=secret,
    )
    with pytest.raises(botocore.exceptions.ClientError, match="SignatureDoesNotMatch"):
        s3("not-the-secret").list_objects_v2(Bucket="specdeepmap")
    assert s3(cfg["AWS_SECRET_ACCESS_KEY"]).list_objects_v2(Bucket="specdeepmap")["KeyCount"] >= 0
    secrets = stack["state"] / "secrets.env"
    assert secrets.stat().st_mode & 0o077 == 0  # the generated secrets are the owner's only


def test_state_survives_stop_and_start_and_stop_leaves_nothing(stack, tmp_path):
    """A model registered with its artifacts in the bucket is still there, artifacts
    included, after stop/start; stop leaves no process and no listening port.
    """
    import boto3
    import mlflow

    cfg = _exports(stack["env"])
    saved = {k: os.environ.get(k) for k in cfg}
    os.environ.update(cfg)  # credentials and endpoints, as `eval "$(local-stack.sh env)"`
    try:
        uri = cfg["MLFLOW_TRACKING_URI"]
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        (tmp_path / "weights.txt").write_text("weights")
        run = client.create_run(client.create_experiment("stack-test"))
        client.log_artifact(run.info.run_id, str(tmp_path / "weights.txt"), "model")
        client.set_terminated(run.info.run_id)
        client.create_registered_model("stack-model")
        version = client.create_model_version(
            "stack-model", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
        )
        # explicit keys: boto3's default session keeps the credentials it resolved first
        s3 = boto3.client(
            "s3",
            endpoint_url=cfg["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=cfg["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=cfg["AWS_SECRET_ACCESS_KEY"],
        )
        s3.put_object(Bucket="specdeepmap", Key="scenes/a.tif", Body=b"scene")

        groups = _groups(stack["state"])
        _script(stack["env"], "stop")
        assert not any(_alive(g) for g in groups.values())
        assert not any(_listening(p) for p in stack["ports"].values())
        assert not any((stack["state"] / f"{name}.pid").exists() for name in SERVICES)

        _script(stack["env"], "start")
        assert s3.get_object(Bucket="specdeepmap", Key="scenes/a.tif")["Body"].read() == b"scene"
        # (through this client, not MLflow's process-wide URIs, which other tests set)
        kept = client.get_model_version("stack-model", version.version)
        got = client.download_artifacts(kept.run_id, "model", str(tmp_path))
        assert (Path(got) / "weights.txt").read_text() == "weights"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_each_service_holds_only_its_own_secrets_and_the_state_is_private(stack):
    """Each service holds only its own secrets, and the stack's files are private.

    A leaked environment (through /proc or a crash report) gives away only that service's keys;
    the stack's databases and logs are the operator's only.
    """
    cfg = _exports(stack["env"])
    secret = {
        "s3": cfg["AWS_SECRET_ACCESS_KEY"],
        "prefect": cfg["PREFECT_API_AUTH_STRING"],
        "mlflow": cfg["MLFLOW_TRACKING_PASSWORD"],
    }
    flask_key = next(
        line.split("=", 1)[1]
        for line in (stack["state"] / "secrets.env").read_text().splitlines()
        if line.startswith("MLFLOW_FLASK_SERVER_SECRET_KEY=")
    )
    allowed = {
        "s3": {"s3"},
        "mlflow": {"s3", "mlflow", "flask"},
        "prefect": {"prefect"},
        "worker": {"s3", "prefect", "mlflow"},
    }
    for service, group in _groups(stack["state"]).items():
        pids = [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-g", str(group)], capture_output=True, text=True
            ).stdout.split()
        ]
        assert pids, f"{service} has no process"
        for pid in pids:
            try:
                environment = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            except (FileNotFoundError, ProcessLookupError):
                continue  # a short-lived child
            held = {
                name
                for name, value in {**secret, "flask": flask_key}.items()
                if value in environment
            }
            assert held <= allowed[service], (service, pid, held - allowed[service])
    for path in stack["state"].rglob("*"):
        if path.is_file() and path.suffix in (".db", ".log", ".env", ".ini"):
            assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"


def test_presigned_urls_are_honoured_up_to_seven_days(stack):
    """A presigned GET works within AWS's 7-day cap.

    One that asks for 10 years is refused, as AWS refuses it (a leaked link must not open the store
    for a decade).
    """
    import boto3
    import httpx
    from botocore.config import Config

    cfg = _exports(stack["env"])
    s3 = boto3.client(
        "s3",
        endpoint_url=cfg["AWS_ENDPOINT_URL"],
        region_name="us-east-1",
        aws_access_key_id=cfg["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=cfg["AWS_SECRET_ACCESS_KEY"],
        config=Config(signature_version="s3v4"),
    )  # SigV4 query signing
    s3.put_object(Bucket="specdeepmap", Key="presign/a.txt", Body=b"hello")
    url = lambda seconds: s3.generate_presigned_url(  # noqa: E731
        "get_object", Params={"Bucket": "specdeepmap", "Key": "presign/a.txt"}, ExpiresIn=seconds
    )
    ok = httpx.get(url(3600), timeout=30)
    assert ok.status_code == 200 and ok.content == b"hello"
    assert httpx.get(url(7 * 24 * 3600), timeout=30).status_code == 200
    assert httpx.get(url(10 * 365 * 24 * 3600), timeout=30).status_code == 403
