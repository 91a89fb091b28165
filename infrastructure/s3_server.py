"""The local stack's S3-compatible object store: moto's S3 server with the stack's credentials
enforced and its objects kept on disk across restarts.

moto keeps objects in memory and, as shipped, answers anyone. This launcher:

* creates one IAM user whose access key is the stack's (``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY`` from the environment), allowed everything, then enforces request
  signatures: unsigned requests and unknown keys or secrets are refused (HTTP 403);
* refuses moto's control API (``/moto-api/``: it resets the store or switches auth off);
* restores at start the objects saved under ``--data``, and saves what changed there every
  ``--save-seconds`` and on SIGTERM/SIGINT, so that the store survives a stop/start as the
  MLflow registry that refers to it does (a crash loses at most the last seconds).

Usage: python infrastructure/s3_server.py --port 9000 --data infrastructure/.state/s3
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import hmac
import json
import logging
import os
import signal
import sys
import threading
from urllib.parse import parse_qsl, quote, urlencode

import boto3
from moto import settings
from moto.core import DEFAULT_ACCOUNT_ID
from moto.iam.models import iam_backends
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

USER = "specdeepmap-stack"
ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)


def _guard(app, key_id: str, secret: str):
    """WSGI middleware in front of moto: 403 for moto's control endpoints and for unsigned
    requests (moto answers some of those with a 500); a presigned (query-signed) request, as
    MLflow's server makes to download artifacts, is verified here and handed to moto signed in
    its headers, which moto can check (it fails on query signatures).
    """

    def refuse(start_response, message: str):
        start_response("403 Forbidden", [("Content-Type", "application/xml")])
        return [f"<Error><Code>AccessDenied</Code><Message>{message}</Message></Error>".encode()]

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO", "").startswith("/moto-api"):
            return refuse(start_response, "the control API is disabled on this server")
        if "HTTP_AUTHORIZATION" not in environ:
            if "X-Amz-Signature" not in environ.get("QUERY_STRING", ""):
                return refuse(start_response, "requests must be signed")
            if not _presigned_valid(environ, key_id, secret):
                return refuse(
                    start_response, "the presigned URL's signature does not match or has expired"
                )
            _sign_in_headers(environ, key_id, secret)
        return app(environ, start_response)

    return wrapped


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


#: the longest validity a presigned URL may ask for: 7 days, as on AWS S3
MAX_PRESIGNED_SECONDS = 7 * 24 * 3600


def _presigned_valid(environ: dict, key_id: str, secret: str) -> bool:
    """Whether a query-signed (SigV4 presigned) request was signed with the stack's key and
    has not expired: the signature computed again as AWS defines it.
    """
    query = parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
    params = dict(query)
    try:
        key, date, region, service, _ = params["X-Amz-Credential"].split("/")
        stamp = params["X-Amz-Date"]
        signed = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        expires = int(params.get("X-Amz-Expires", "0"))
        headers = params["X-Amz-SignedHeaders"].split(";")
    except (KeyError, ValueError):
        return False
    now = datetime.datetime.now(datetime.UTC)
    if not 1 <= expires <= MAX_PRESIGNED_SECONDS:  # AWS refuses the same (SigV4 presigning)
        return False
    if key != key_id or now > signed + datetime.timedelta(seconds=expires):
        return False
    encode = lambda text: quote(text, safe="-_.~")  # noqa: E731
    canonical_query = "&".join(
        sorted(f"{encode(k)}={encode(v)}" for k, v in query if k != "X-Amz-Signature")
    )
    values = {h: environ.get("HTTP_" + h.upper().replace("-", "_"), "").strip() for h in headers}
    canonical = "\n".join(
        [
            environ["REQUEST_METHOD"],
            quote(environ.get("PATH_INFO", "/"), safe="/-_.~"),
            canonical_query,
            "".join(f"{h}:{values[h]}\n" for h in headers),
            ";".join(headers),
            "UNSIGNED-PAYLOAD",
        ]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    signing_key = _hmac(
        _hmac(_hmac(_hmac(f"AWS4{secret}".encode(), date), region), service), "aws4_request"
    )
    expected = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, params.get("X-Amz-Signature", ""))


def _sign_in_headers(environ: dict, key_id: str, secret: str) -> None:
    """Rewrite a verified presigned request into the same request signed in its headers."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    query = [
        (k, v)
        for k, v in parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True)
        if not k.startswith("X-Amz-")
    ]
    environ["QUERY_STRING"] = urlencode(query, quote_via=quote)
    url = f"http://{environ['HTTP_HOST']}{quote(environ.get('PATH_INFO', '/'), safe='/-_.~')}"
    request = AWSRequest(
        method=environ["REQUEST_METHOD"],
        url=url + (f"?{environ['QUERY_STRING']}" if query else ""),
        headers={"host": environ["HTTP_HOST"]},
    )
    S3SigV4Auth(Credentials(key_id, secret), "s3", "us-east-1").add_auth(request)
    for name, value in request.headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value


def _enforce_credentials(endpoint: str, key_id: str, secret: str) -> None:
    """One IAM user with the stack's key, allowed everything; then signatures are checked."""
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",
    )
    iam.create_user(UserName=USER)
    iam.put_user_policy(UserName=USER, PolicyName="all", PolicyDocument=ALLOW_ALL)
    iam.create_access_key(UserName=USER)
    # moto draws keys at random; the stack's keys come from the environment
    key = iam_backends[DEFAULT_ACCOUNT_ID]["aws"].get_user(USER).access_keys[0]
    key.access_key_id, key.secret_access_key = key_id, secret
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # every request from now on is authenticated


class Snapshot:
    """Objects on disk: ``data/<sha256 of bucket and key>`` plus an index (bucket → key →
    file and ETag), each written to a temporary name and moved into place.
    """

    def __init__(self, folder: str, s3):
        self.folder, self.s3 = folder, s3
        self.index_path = os.path.join(folder, "index.json")
        self.index: dict[str, dict[str, dict]] = {}
        if os.path.exists(self.index_path):
            with open(self.index_path) as handle:
                self.index = json.load(handle)
        self.lock = threading.Lock()

    def _file(self, bucket: str, key: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(f"{bucket}/{key}".encode()).hexdigest())

    def restore(self) -> int:
        """Put every saved bucket and object back into the (empty) server."""
        count = 0
        for bucket, objects in self.index.items():
            self.s3.create_bucket(Bucket=bucket)
            for key, entry in objects.items():
                with open(self._file(bucket, key), "rb") as handle:
                    self.s3.put_object(
                        Bucket=bucket,
                        Key=key,
                        Body=handle,
                        ContentType=entry.get("type", "binary/octet-stream"),
                    )
                count += 1
        return count

    def save(self) -> None:
        """Write what changed since the last save (new or changed ETags), drop what is gone."""
        with self.lock:
            index: dict[str, dict[str, dict]] = {}
            for bucket in (b["Name"] for b in self.s3.list_buckets()["Buckets"]):
                saved, index[bucket] = self.index.get(bucket, {}), {}
                pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for item in (o for page in pages for o in page.get("Contents", [])):
                    key, etag = item["Key"], item["ETag"]
                    entry = saved.get(key)
                    if entry is None or entry["etag"] != etag:
                        got = self.s3.get_object(Bucket=bucket, Key=key)
                        path = self._file(bucket, key)
                        with open(path + ".tmp", "wb") as handle:
                            handle.write(got["Body"].read())
                        os.replace(path + ".tmp", path)
                        entry = {"etag": etag, "type": got.get("ContentType", "")}
                    index[bucket][key] = entry
            for bucket, objects in self.index.items():
                for key in objects.keys() - index.get(bucket, {}).keys():
                    try:
                        os.remove(self._file(bucket, key))
                    except FileNotFoundError:
                        pass
            if index != self.index:
                with open(self.index_path + ".tmp", "w") as handle:
                    json.dump(index, handle)
                os.replace(self.index_path + ".tmp", self.index_path)
                self.index = index


def _serve(app, host: str, port: int):
    """A threaded WSGI server for ``app`` in a background thread (port 0: any free one)."""
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _client(endpoint: str, key_id: str, secret: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
    )


def main() -> None:
    """Start the server, enforce the credentials, restore, save until stopped."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--data", required=True, help="folder the objects are kept in")
    parser.add_argument("--save-seconds", type=float, default=2.0)
    args = parser.parse_args()
    key_id, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not key_id or not secret:
        sys.exit(
            "s3_server: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (the keys clients "
            "must sign with)"
        )
    os.makedirs(args.data, mode=0o700, exist_ok=True)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    # moto's state is the process's: a private port for setting up and restoring, then the
    # public one, so that clients never see a half-restored store
    app = _guard(DomainDispatcherApplication(create_backend_app), key_id, secret)
    setup = _serve(app, args.host, 0)
    endpoint = f"http://{args.host}:{setup.server_port}"
    _enforce_credentials(endpoint, key_id, secret)
    restored = Snapshot(args.data, _client(endpoint, key_id, secret)).restore()
    setup.shutdown()
    server = _serve(app, args.host, args.port)
    endpoint = f"http://{args.host}:{args.port}"
    snapshot = Snapshot(args.data, _client(endpoint, key_id, secret))
    print(
        f"s3_server: restored {restored} objects from {args.data}; serving {endpoint}", flush=True
    )

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    while not stopping.wait(args.save_seconds):
        try:
            snapshot.save()
        except Exception as error:  # a save that fails now is tried again next round
            print(f"s3_server: saving failed ({error}); trying again", flush=True)
    snapshot.save()
    server.shutdown()
    print("s3_server: saved and stopped", flush=True)


if __name__ == "__main__":
    main()
