"""Mapper benchmark: end-to-end vs model-only vs read-only vs a SpecDeepMap-style baseline.

U-Net/ResNet-18 (random weights: speed does not depend on them), 13-band uint16 generated
scenes, 256 px training tiles, 10 % overlap. Every measurement runs in a fresh process with
GDAL_CACHEMAX pinned, so peak RSS (VmHWM) is its own. Measured per scene size:

* ``map``: ``specdeepmap.mapping.map_scene`` with its defaults (window chosen per scene,
  channels-last, batches, blending, COG output), once per ``--precisions`` entry (int8 includes
  its calibration);
* ``model``: the network alone, prepared as the mapper prepares it (fp32: batch norms folded,
  channels-last; int8: quantized), on the same number of windows of the same size (random
  input);
* ``--engines``: the same maps with ONNX Runtime running the network (rows "fp32
  onnxruntime", "int8 onnxruntime"): the model exported once (``export_onnx``), int8 with
  its convolutions statically quantized once (calibrated on eight windows of the scene; a
  real model is calibrated on its training chips), neither's export in the timed run; and
  with OpenVINO (``openvino``: the same fp32 file in fp32 and bf16, int8 its convolutions
  quantized by NNCF on the same windows, before the timed runs);
* ``read``: one pass over the scene in strips (I/O floor);
* ``baseline``: SpecDeepMap's mapper: 256 px tiles, stride ⌊256·0.8⌋, margins cropped, batch 1,
  the whole output in memory, a plain striped GeoTIFF; run as often as the mapper, in the
  same rounds (the table gives its median and fastest–slowest, and the speed-up's widest
  range: the fastest baseline over the slowest map to the slowest over the fastest);
* peak RSS against scene width (1024 rows; ``--widths``): the buffers that span the scene;
  every row also gives the *floor*: RSS once torch, smp and the model are loaded, before any
  pixel (the same in the baseline's process);
* ``--repeats N``: ``map`` and ``model`` N times each, alternating (the table gives the
  median, and the spread of map/model);
* band files (``--bands-size``, 0 to skip): the scene written as 13 single-band GeoTIFFs at
  Sentinel-2's 10/20/60 m, stacked as a VRT (``specdeepmap.bands.stack_bands``), mapped
  beside the same scene stacked in one GeoTIFF;
* the quality guard (``--only-guard``: this table alone): the seconds the verdict takes on
  the mapping's main thread inside each ``map`` run, and a map with an SCL-like mask at 20 m
  (a fifth of the scene flagged) against the plain map, alternating, ``--repeats`` each;
  and the offline cloud detector (``--cloud-mask s2cloudless``) alone, once per size;
* ``quality``: with a trained model (``--quality-model``, default the one ``make run`` trains),
  the share of pixels whose class differs from fp32 and the mean IoU against the labels, per
  precision (random weights say nothing about that).

Usage: python benchmarks/bench_mapping.py [--sizes 2048 4096 10980] [--device cpu]
       [--precisions fp32 int8] [--repeats 5] [--bands-size 4092]
       [--quality-model runs/demo/training/<run>/model.pt]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent("""
    import json, math, sys, time
    import specdeepmap; specdeepmap.hide_triton_without_gpu()  # as the entry points do
    import numpy as np, rasterio
    from rasterio.windows import Window
    from specdeepmap.inference import load_model
    from specdeepmap.mapping import map_scene, prepare_predictor
    from specdeepmap.params import MapParams
    mode, scene, model_file, out, device = sys.argv[1:6]
    mode, _, precision = mode.partition(":")
    precision, _, engine = precision.partition(":")
    result = {}
    if engine == "openvino":  # the ONNX file (int8: the quantized .xml) on OpenVINO
        import os
        from specdeepmap.openvino_model import OpenVinoPredictor, compile_network, onnx_config
        config, _ = onnx_config(os.path.join(os.path.dirname(model_file), "model.onnx"), "")
        predictor = OpenVinoPredictor(compile_network(model_file, precision), config,
                                      model_file, precision)
    else:
        predictor = load_model(model_file, device)  # loading is not timed
    # the runtime floor: interpreter, torch, smp and the model, before any pixel
    result["floor_rss_mb"] = int([l for l in open("/proc/self/status")
                                  if l.startswith("VmRSS")][0].split()[1]) / 1024
    start = time.perf_counter()
    if mode in ("map", "mapmask"):
        mask = None
        if mode == "mapmask":  # an SCL-like raster at 20 m beside the scene
            from specdeepmap.masks import QualityMask
            mask = QualityMask.build([scene[:-4] + "_SCL.tif"], "s2-scl")
        report = map_scene(scene, model_file, out,
                           MapParams(device=device, precision=precision),
                           predictor=predictor, mask=mask)
        result.update(guard=report.guard_seconds, mask_read=report.mask_read_seconds,
                      verdict=report.verdict.status, masked=report.masked_share)
        # a scene smaller than a window is processed as one padded window
        side = math.isqrt(report.pixels_processed // report.windows)
        result.update(windows=report.windows, pixels=report.pixels_processed,
                      window=report.window, side=side, batch=report.batch_size,
                      setup=report.setup_seconds)
    elif mode == "model":
        windows, window, batch = (int(v) for v in out.split(","))
        x = np.random.default_rng(0).integers(1, 5000, (batch, 13, window, window))
        x = x.astype(np.uint16)
        # the network as the mapper prepares it
        predictor = prepare_predictor(predictor, MapParams(precision=precision),
                                      lambda: [x[:1]] * 8)
        start = time.perf_counter()
        for _ in range(math.ceil(windows / batch)):
            predictor.probabilities(x, channels_last=precision != "int8",
                                    autocast=precision == "bf16").cpu().numpy()
    elif mode == "clouds":  # the offline cloud detector alone (map --cloud-mask s2cloudless)
        from specdeepmap.clouds import detect_clouds
        with rasterio.open(scene) as src:
            found = detect_clouds(src, scene, out)
        result.update(cloud_share=found.share)
    elif mode == "read":
        with rasterio.open(scene) as src:
            for y in range(0, src.height, 512):
                src.read(window=Window(0, y, src.width, min(512, src.height - y)))
    else:  # SpecDeepMap-style baseline
        tile, p = 256, 0.10
        stride, margin = math.floor(tile * (1 - 2 * p)), math.floor(tile * p)
        lut = predictor.value_lut()[1:]
        with rasterio.open(scene) as src:
            height, width = src.height, src.width
            output = np.zeros((height, width), np.uint8)  # whole output in memory
            xs = list(range(0, width - tile, stride)) + [width - tile]
            ys = list(range(0, height - tile, stride)) + [height - tile]
            for x in xs:
                for y in ys:
                    data = src.read(window=Window(x, y, tile, tile))
                    classes = lut[predictor.probabilities(data[None]).argmax(1)[0].numpy()]
                    r0 = 0 if y == 0 else margin
                    r1 = tile if y == ys[-1] else tile - margin
                    c0 = 0 if x == 0 else margin
                    c1 = tile if x == xs[-1] else tile - margin
                    output[y + r0:y + r1, x + c0:x + c1] = classes[r0:r1, c0:c1]
            profile = dict(driver="GTiff", width=width, height=height, count=1, dtype="uint8",
                           crs=src.crs, transform=src.transform)
        with rasterio.open(out, "w", **profile) as dst:
            dst.write(output[None])
        result.update(windows=len(xs) * len(ys), pixels=len(xs) * len(ys) * tile * tile)
    result["seconds"] = time.perf_counter() - start
    hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
    result["peak_rss_mb"] = int(hwm.split()[1]) / 1024
    print(json.dumps(result))
""")


def run(*args: str) -> dict:
    """One measurement in a fresh interpreter with a pinned GDAL cache."""
    env = {**os.environ, "GDAL_CACHEMAX": "64"}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, text=True, env=env
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_model(path: str) -> str:
    """A U-Net/ResNet-18 model file for 13 bands, 6 classes, 256 px tiles (random weights)."""
    import torch

    from specdeepmap.inference import export_model_file
    from specdeepmap.model_config import ModelConfig
    from specdeepmap.models import ModelSpec, build_model

    torch.manual_seed(0)
    config = ModelConfig(
        architecture="unet",
        backbone="resnet18",
        in_channels=13,
        num_classes=7,
        class_values=[1, 2, 3, 4, 5, 6],
        tile_size=[256, 256],
        normalization={"scaler": 10000.0, "mean": None, "std": None, "nodata": 0.0},
    )
    return export_model_file(config, build_model(ModelSpec("unet", "resnet18", 13, 7)), path)


def band_files_scene(stacked: str, folder: str) -> str:
    """The stacked generated scene as 13 single-band GeoTIFFs at Sentinel-2's resolutions
    (10 m: B02-B04, B08; 20 m: B05-B07, B8A, B11, B12; 60 m: B01, B09, B10; coarser bands
    averaged), stacked again as a VRT through :func:`specdeepmap.bands.stack_bands`.
    """
    import rasterio
    from rasterio.enums import Resampling

    from specdeepmap.bands import stack_bands
    from specdeepmap.sample_data import SENTINEL2_BANDS

    factor = {
        "B01": 6,
        "B09": 6,
        "B10": 6,
        "B05": 2,
        "B06": 2,
        "B07": 2,
        "B8A": 2,
        "B11": 2,
        "B12": 2,
    }
    os.makedirs(folder, exist_ok=True)
    files = []
    with rasterio.open(stacked) as src:
        for band, name in enumerate(SENTINEL2_BANDS, start=1):
            f = factor.get(name, 1)
            shape = (src.height // f, src.width // f)
            data = src.read(band, out_shape=shape, resampling=Resampling.average)
            path = os.path.join(folder, f"T33UUU_20260101T101010_{name}.tif")
            with rasterio.open(
                path,
                "w",
                driver="GTiff",
                width=shape[1],
                height=shape[0],
                count=1,
                dtype="uint16",
                crs=src.crs,
                nodata=src.nodata,
                transform=src.transform * src.transform.scale(f, f),
                tiled=True,
                compress="deflate",
            ) as dst:
                dst.write(data, 1)
            files.append(path)
    return stack_bands(files, os.path.join(folder, "scene.vrt"), resampling="nearest")


def quality(
    model_file: str,
    scene: str,
    labels: str,
    precisions: list[str],
    engines: list[str],
    device: str,
    work: str,
) -> list[tuple]:
    """(engine and precision, share of pixels whose class differs from torch fp32, mean IoU)
    with a real model, mapped as a user maps it (ONNX files exported and int8 calibrated on
    the model's training chips, once, in the private cache).
    """
    import rasterio

    from specdeepmap.mapping import map_scene
    from specdeepmap.params import MapParams

    rows, reference = [], None
    ordered = ["fp32", *[p for p in precisions if p != "fp32"]]
    for engine, precision in [(e, p) for e in engines for p in ordered]:
        if engine == "onnxruntime" and precision == "bf16":
            continue  # ONNX Runtime maps in fp32 or int8
        out = os.path.join(work, f"quality-{engine}-{precision}.tif")
        params = MapParams(device=device, precision=precision, engine=engine)
        report = map_scene(scene, model_file, out, params, gt_uri=labels)
        precision = precision if engine == "torch" else f"{precision} {engine}"
        with rasterio.open(out) as dst:
            classes = dst.read(1)
        reference = classes if reference is None else reference
        valid = reference > 0
        rows.append(
            (precision, float((classes[valid] != reference[valid]).mean()), report.mean_iou)
        )
    return rows


def onnx_models(model_file: str, scene: str, work: str) -> dict[str, str]:
    """The benchmark's model as ONNX files, by precision: fp32 (``export_onnx``, checked
    against torch) and int8 (its convolutions quantized, calibrated on eight 256² windows of
    ``scene``: the random-weight model has no training chips, and its near-tied classes would
    fail the int8 export's agreement check, which speed does not depend on).
    """
    import onnx
    import rasterio

    from specdeepmap.onnx_model import PRECISION_KEY, export_onnx, quantize
    from specdeepmap.windows import calibration_windows

    fp32 = os.path.join(work, "model.onnx")
    int8 = os.path.join(work, "model_int8.onnx")
    if not os.path.exists(fp32):
        export_onnx(model_file, fp32)
    if not os.path.exists(int8):
        with rasterio.open(scene) as src:
            windows = [w.astype("float32") for w in calibration_windows(src, 256)]
        quantize(fp32, int8, windows)
        model = onnx.load(int8)
        onnx.helper.set_model_props(
            model,
            {p.key: p.value for p in model.metadata_props} | {PRECISION_KEY: "int8"},
        )
        onnx.save(model, int8)
    return {"fp32": fp32, "int8": int8}


def openvino_models(onnx_files: dict[str, str], scene: str, work: str) -> dict[str, str]:
    """The ONNX fp32 file for OpenVINO's fp32 and bf16, and its int8 network (NNCF,
    calibrated on the same eight windows of ``scene`` as ONNX Runtime's int8 file).
    """
    import openvino as ov
    import rasterio

    from specdeepmap.openvino_model import quantize_int8
    from specdeepmap.windows import calibration_windows

    int8 = os.path.join(work, "model_openvino_int8.xml")
    if not os.path.exists(int8):
        with rasterio.open(scene) as src:
            windows = [w.astype("float32") for w in calibration_windows(src, 256)]
        ov.save_model(quantize_int8(onnx_files["fp32"], windows), int8, compress_to_fp16=False)
    return {"fp32": onnx_files["fp32"], "bf16": onnx_files["fp32"], "int8": int8}


def latest_demo_model() -> str:
    """The model file of the newest demo training (``make run``), or "" when there is none."""
    found = sorted(glob.glob("runs/demo/training/*/model.pt"))
    return found[-1] if found else ""


def measure(
    size: int,
    scene: str,
    precision: str,
    model_file: str,
    work: str,
    device: str,
    repeats: int,
    baselines: list[dict] | None = None,
) -> tuple[dict, dict, list[float]]:
    """Median map and model-only runs (alternating, each in a fresh process) and every
    run's map/model ratio. With ``baselines`` (a list), the baseline runs once in every
    round too, appended to it, so that it is repeated as often as the mapper.
    """
    maps, models = [], []
    for _ in range(repeats):
        if baselines is not None:
            baselines.append(
                run("baseline", scene, model_file, os.path.join(work, f"base{size}.tif"), device)
            )
        maps.append(
            run(
                f"map:{precision}",
                scene,
                model_file,
                os.path.join(work, f"map{size}-{precision}.tif"),
                device,
            )
        )
        ours = maps[-1]
        models.append(
            run(
                f"model:{precision}",
                scene,
                model_file,
                f"{ours['windows']},{ours['side']},{ours['batch']}",
                device,
            )
        )
    ratios = [m["seconds"] / o["seconds"] for o, m in zip(maps, models, strict=True)]
    return median(maps) | {"all_seconds": [m["seconds"] for m in maps]}, median(models), ratios


def median(runs: list[dict]) -> dict:
    """The run of median seconds."""
    return sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]


def write_scl(scene: str) -> str:
    """An SCL-like mask at twice the scene's pixel size beside it (``SCENE_SCL.tif``): mostly
    vegetation (4), with cloud (9) and shadow (3) blocks over about a fifth of the scene.
    """
    import numpy as np
    import rasterio
    from rasterio.transform import Affine

    with rasterio.open(scene) as src:
        t, height, width, crs = src.transform, src.height, src.width, src.crs
    rows, cols = -(-height // 2), -(-width // 2)
    scl = np.full((rows, cols), 4, np.uint8)
    scl[: rows // 4, : cols // 2] = 9  # a cloud over an eighth
    scl[rows // 4 : rows // 4 + rows // 16, :cols] = 3  # its shadow
    path = scene[:-4] + "_SCL.tif"
    profile = dict(
        driver="GTiff",
        width=cols,
        height=rows,
        count=1,
        dtype="uint8",
        crs=crs,
        transform=Affine(t.a * 2, 0, t.c, 0, t.e * 2, t.f),
        tiled=True,
        compress="deflate",
    )
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(scl, 1)
    return path


def guard_table(rows: list, args, work: str, model_file: str) -> None:
    """The quality guard's cost, per size and precision: plain maps (the verdict alone) and
    maps with an SCL-like mask (mask + verdict), alternating, ``--repeats`` each; medians.

    "guard s" is the time on the mapping's main thread (masking, counting, judging); the
    mask is read in the reader thread, beside the network ("mask read s").
    """
    print("\nQuality guard within the mapping time (medians of alternating runs)")
    print(
        "scene | precision | map s | guard s (verdict) | share | map with mask s | "
        "guard s (mask + verdict) | share | mask read s (reader thread) | masked | "
        "with mask / without | cloud detector s | detector / map"
    )
    print(" | ".join("---" for _ in range(13)))
    detector: dict[int, float] = {}
    for size, precision, ours in rows:
        scene = os.path.join(work, f"s{size}", "demo_s2.tif")
        plain, masked = [ours] if ours else [], []
        for _ in range(args.repeats):
            if len(plain) < args.repeats:
                out = os.path.join(work, f"map{size}-{precision}.tif")
                plain.append(run(f"map:{precision}", scene, model_file, out, args.device))
            out = os.path.join(work, f"mask{size}-{precision}.tif")
            masked.append(run(f"mapmask:{precision}", scene, model_file, out, args.device))
        a, b = median(plain), median(masked)
        if size not in detector:  # independent of the network's precision: once per size
            out = os.path.join(work, f"clouds{size}.tif")
            detector[size] = run("clouds", scene, model_file, out, args.device)["seconds"]
        print(
            f"{size}² | {precision} | {a['seconds']:.1f} | {a['guard']:.2f} | "
            f"{a['guard'] / a['seconds']:.1%} | {b['seconds']:.1f} | {b['guard']:.2f} | "
            f"{b['guard'] / b['seconds']:.1%} | {b['mask_read']:.2f} | {b['masked']:.0%} | "
            f"{b['seconds'] / a['seconds']:.2f} | {detector[size]:.1f} | "
            f"{detector[size] / a['seconds']:.1%}"
        )


def main() -> None:
    """Generate scenes, run every measurement, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        "--size",
        type=int,
        nargs="+",
        default=[2048, 4096, 10980],
        help="square scene edges in px (10980: a whole Sentinel-2 tile)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--precisions", nargs="+", default=["fp32", "int8"], choices=["fp32", "bf16", "int8"]
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="map and model-only runs per size and precision"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=["torch", "onnxruntime"],
        choices=["torch", "onnxruntime", "openvino"],
        help="what runs the network (onnxruntime: fp32 and int8 ONNX files, not bf16; "
        "openvino: the fp32 file in fp32 and bf16, its NNCF int8 network)",
    )
    parser.add_argument(
        "--bands-size",
        type=int,
        default=4092,
        help="edge of the band-files scene (a multiple of 6 px: 60 m bands); 0 skips it",
    )
    parser.add_argument(
        "--quality-model",
        default=latest_demo_model(),
        help="a trained model file (default: the newest `make run` trained)",
    )
    parser.add_argument("--quality-scene", default="runs/demo/scene/demo_s2.tif")
    parser.add_argument("--quality-labels", default="runs/demo/scene/demo_s2_labels.tif")
    parser.add_argument(
        "--widths",
        type=int,
        nargs="*",
        default=[2048, 16384],
        help="scene widths (1024 rows) for peak RSS against width",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--only-guard",
        action="store_true",
        help="only the quality guard's table (plain and masked maps per size and precision)",
    )
    args = parser.parse_args()
    from specdeepmap.sample_data import generate_scene

    work = args.workdir or tempfile.mkdtemp(prefix="bench-mapping-")
    model_file = make_model(os.path.join(work, "model.pt"))
    rows = []
    if args.only_guard:
        for size in args.sizes:
            scene = generate_scene(os.path.join(work, f"s{size}"), size, size, seed=2).image_uri
            write_scl(scene)
        guard_table(
            [(size, p, None) for size in args.sizes for p in args.precisions],
            args,
            work,
            model_file,
        )
        return
    for size in args.sizes:
        scene = generate_scene(os.path.join(work, f"s{size}"), size, size, seed=2).image_uri
        write_scl(scene)
        read = run("read", scene, model_file, "", args.device)
        bases: list[dict] = []
        engines = {"torch": {p: model_file for p in args.precisions}}
        if {"onnxruntime", "openvino"} & set(args.engines):
            engines["onnxruntime"] = onnx_models(model_file, scene, work)
        if "openvino" in args.engines:
            engines["openvino"] = openvino_models(engines["onnxruntime"], scene, work)
        for i, (engine, precision) in enumerate(
            (e, p) for e in args.engines for p in args.precisions if p in engines[e]
        ):
            ours, model, ratios = measure(
                size,
                scene,
                f"{precision}:openvino" if engine == "openvino" else precision,
                engines[engine][precision],
                work,
                args.device,
                args.repeats,
                baselines=bases if i == 0 else None,  # alternating with the first
            )
            label = precision if engine == "torch" else f"{precision} {engine}"
            rows.append((size, label, ours, model, read, bases, ratios))

    mpx = lambda size, r: size * size / 1e6 / r["seconds"]  # noqa: E731
    print(
        f"\nMapper, U-Net/ResNet-18, 13 bands, 256 px tiles, 10 % overlap, device "
        f"{args.device}, {os.cpu_count()} cores, GDAL_CACHEMAX 64 MB, median of "
        f"{args.repeats} run(s) each of the mapper and the baseline (fastest–slowest)"
    )
    header = [
        "scene",
        "precision",
        "window",
        "windows",
        "map s",
        "map Mpx/s",
        "model-only Mpx/s",
        "map/model",
        "map/model range",
        "read Mpx/s",
        "processed/scene px",
        "baseline s (range)",
        "baseline Mpx/s",
        "speed-up (range)",
        "RSS map MB",
        "RSS baseline MB",
        "RSS floor MB",
        "int8 setup s",
    ]
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for size, precision, ours, model, read, bases, ratios in rows:
        base = median(bases)
        seconds = [b["seconds"] for b in bases]
        maps = ours["all_seconds"]
        cells = [
            f"{size}²",
            precision,
            str(ours["window"]),
            str(ours["windows"]),
            f"{ours['seconds']:.1f}",
            f"{mpx(size, ours):.2f}",
            f"{mpx(size, model):.2f}",
            f"{model['seconds'] / ours['seconds']:.2f}",
            f"{min(ratios):.2f}-{max(ratios):.2f}",
            f"{mpx(size, read):.0f}",
            f"{ours['pixels'] / size**2:.2f}",
            f"{base['seconds']:.1f} ({min(seconds):.1f}–{max(seconds):.1f})",
            f"{mpx(size, base):.2f}",
            f"{base['seconds'] / ours['seconds']:.2f}x "
            f"({min(seconds) / max(maps):.2f}–{max(seconds) / min(maps):.2f})",
            f"{ours['peak_rss_mb']:.0f}",
            f"{base['peak_rss_mb']:.0f}",
            f"{ours['floor_rss_mb']:.0f}",
            f"{ours['setup']:.1f}" if precision == "int8" else "–",
        ]
        print(" | ".join(cells))
    torch_rows = [(size, p, ours) for size, p, ours, *_ in rows if " " not in p]
    guard_table(torch_rows, args, work, model_file)
    if args.bands_size:
        size = args.bands_size
        stacked = generate_scene(os.path.join(work, f"b{size}"), size, size, seed=4).image_uri
        vrt = band_files_scene(stacked, os.path.join(work, f"bands{size}"))
        print(
            f"\nBand files: {size}² scene as one GeoTIFF and as 13 GeoTIFFs at 10/20/60 m "
            "through a VRT"
        )
        print(
            "precision | input | map s | map Mpx/s | ratio | RSS map MB\n--- | --- | --- | --- "
            "| --- | ---"
        )
        for precision in args.precisions:
            one = run(
                f"map:{precision}",
                stacked,
                model_file,
                os.path.join(work, f"stacked{size}.tif"),
                args.device,
            )
            many = run(
                f"map:{precision}",
                vrt,
                model_file,
                os.path.join(work, f"vrt{size}.tif"),
                args.device,
            )
            for name, r in (("stacked GeoTIFF", one), ("13-file VRT", many)):
                print(
                    f"{precision} | {name} | {r['seconds']:.1f} | {mpx(size, r):.2f} | "
                    f"{r['seconds'] / one['seconds']:.2f} | {r['peak_rss_mb']:.0f}"
                )
    if args.widths:
        precision = args.precisions[-1]
        print(f"\nPeak RSS against scene width, 1024 rows, {precision}")
        print("width | map s | RSS map MB | RSS floor MB\n--- | --- | --- | ---")
        for width in args.widths:
            scene = generate_scene(os.path.join(work, f"w{width}"), width, 1024, seed=3).image_uri
            ours = run(
                f"map:{precision}",
                scene,
                model_file,
                os.path.join(work, f"w{width}.tif"),
                args.device,
            )
            print(
                f"{width} | {ours['seconds']:.1f} | {ours['peak_rss_mb']:.0f} | "
                f"{ours['floor_rss_mb']:.0f}"
            )
    if not os.path.exists(args.quality_model):
        print(
            f"\nNo trained model at {args.quality_model!r} (run `make run` first): "
            "quality per precision skipped"
        )
        return
    print(f"\nQuality per precision, {args.quality_model} on {args.quality_scene}")
    print("precision | classes changed vs torch fp32 | mean IoU\n--- | --- | ---")
    for precision, changed, iou in quality(
        args.quality_model,
        args.quality_scene,
        args.quality_labels,
        args.precisions,
        args.engines,
        args.device,
        work,
    ):
        print(f"{precision} | {changed:.3%} | {iou:.4f}")


if __name__ == "__main__":
    main()
