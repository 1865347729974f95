"""Where a GPU sliding-window run spends its time: for a device lease, when a ratio in benchmarks/inference.py
needs explaining. One process, one model, one JSON line per measurement:

* ``window``: the network alone on a window batch, per window, in float32 and the device's low precision (float16
  on a GPU, bfloat16 on a CPU with AMX or AVX-512-BF16, none on other CPUs), in the NCDHW and the channels-last
  (NDHWC) layout, cuDNN autotuned, median of 5 after 2 warm-ups;
* ``monai``: plain ``sliding_window_inference(x, roi, 1, net, overlap=0.25)`` plus ``argmax``, as in inference.py;
* ``medseg``: ``sliding_window_labels`` in fp32, the low precision and auto: time, precision, window batch, peak
  memory, and agreement with and speed-up over ``monai``;
* ``profile``: torch's profiler over one low-precision MedSeg run: the operators with the most device time of
  their own.

Not float16 on a CPU: where it lacks AVX-512-FP16, PyTorch's float16 convolutions fall back to kernels that ran a
32^3 DynUNet window in 32 s against 0.13 s in float32 (an AMD EPYC, session 13).

    python benchmarks/gpu_profile.py --model dynunet --classes 105 --shape 272 272 224 --roi 128 128 128
    python benchmarks/gpu_profile.py --device cpu --model dynunet --classes 3 --shape 40 40 32 --roi 32 32 32

The synthetic CT is on the untrained models' grid (1.5 x 1.5 x 2 mm), so the network sees ``--shape``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import model_folder, network_input, synthetic_ct  # noqa: E402  (benchmarks/inference.py)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="dynunet")
    parser.add_argument("--classes", type=int, default=105)
    parser.add_argument("--shape", type=int, nargs=3, default=[272, 272, 224])
    parser.add_argument("--roi", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--parts", nargs="+", default=["window", "monai", "medseg", "profile"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from medseg import inference
    from medseg.models.folder import load_model_folder
    from monai.inferers import sliding_window_inference

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    low = inference.low_precision_for(device)  # float16 on a GPU, bfloat16 on a CPU that runs it fast, else None
    low_name = inference.precision_name(low)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def timed(function, repeats=args.repeats, warmups=1):
        for _ in range(warmups):
            function()
        sync()
        times, result = [], None
        for _ in range(repeats):
            start = time.perf_counter()
            result = function()
            sync()
            times.append(time.perf_counter() - start)
        return round(float(np.median(times)), 4), result

    def peak_mib() -> float | None:
        return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if cuda else None

    def reset_peak() -> None:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def emit(row: dict) -> None:
        print(json.dumps({"model": args.model, "shape": args.shape, **row}), flush=True)

    with tempfile.TemporaryDirectory(prefix="medseg-gpu-profile-") as folder:
        work = Path(folder)
        image = synthetic_ct(tuple(args.shape), work / "ct.nii", (1.5, 1.5, 2.0))
        folder_path = model_folder(args.model, args.classes, args.roi, work)
        card, volume = network_input(folder_path, image)
        network = load_model_folder(folder_path).network.to(device).eval()
        settings = card.inference
        emit({"device": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__})

        if "window" in args.parts:
            torch.backends.cudnn.benchmark = True
            for dtype in [torch.float32] + ([low] if low is not None else []):
                for layout in (torch.contiguous_format, torch.channels_last_3d):
                    for batch in (1, 2):
                        net = network.to(memory_format=layout)
                        x = torch.randn((batch, volume.shape[0], *args.roi), device=device)
                        x = x.contiguous(memory_format=layout)

                        def run(net=net, x=x, dtype=dtype):
                            with (
                                torch.inference_mode(),
                                torch.autocast(device.type, dtype, enabled=dtype != torch.float32),
                            ):
                                return net(x)

                        reset_peak()
                        seconds, _ = timed(run, repeats=5, warmups=2)
                        emit(
                            {
                                "part": "window",
                                "dtype": str(dtype).split(".")[1],
                                "layout": "channels_last" if layout == torch.channels_last_3d else "ncdhw",
                                "batch": batch,
                                "ms_per_window": round(1000 * seconds / batch, 2),
                                "peak_MiB": peak_mib(),
                            }
                        )
            network.to(memory_format=torch.contiguous_format)
            torch.backends.cudnn.benchmark = False

        x = torch.from_numpy(volume[None]).to(device)
        monai_labels, monai_seconds = None, None
        if "monai" in args.parts:

            def monai():
                with torch.inference_mode():
                    out = sliding_window_inference(x, settings.roi_size, 1, network, overlap=0.25)
                    return out.argmax(1)[0].cpu().numpy().astype(np.uint8)

            reset_peak()
            monai_seconds, monai_labels = timed(monai)
            emit({"part": "monai", "seconds": monai_seconds, "peak_MiB": peak_mib()})

        def medseg(precision: str, report, blend_features: bool = True):
            options = inference.InferenceOptions(precision=precision, backend="torch", blend_features=blend_features)
            return inference.sliding_window_labels(
                network, volume, settings, device=device, options=options, report=report
            )

        if "medseg" in args.parts:
            # fp32 with the logits blended, as before feature blending: its memory and speed beside the default's
            runs = (
                [("fp32", True), ("fp32", False)] + ([(low_name, True)] if low is not None else []) + [("auto", True)]
            )
            for precision, blend in runs:
                report = inference.InferenceReport()
                reset_peak()
                seconds, labels = timed(lambda p=precision, r=report, b=blend: medseg(p, r, b))
                row = {
                    "part": "medseg",
                    "requested": precision,
                    "precision": report.precision,
                    "blended_channels": report.blended_channels,
                    "window_batch": report.window_batch,
                    "seconds": seconds,
                    "peak_MiB": peak_mib(),
                }
                if monai_labels is not None:
                    row["agreement"] = round(float(np.mean(labels == monai_labels)), 6)
                    row["speedup_vs_monai"] = round(monai_seconds / seconds, 2)
                emit(row)

        if "profile" in args.parts and low is not None:
            from torch.profiler import ProfilerActivity, profile

            report = inference.InferenceReport()
            medseg(low_name, report)  # warm
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                medseg(low_name, report)
                sync()
            key = "self_device_time_total" if cuda else "self_cpu_time_total"
            events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
            top = [{"op": e.key[:60], "ms": round(getattr(e, key, 0) / 1000, 2), "calls": e.count} for e in events[:15]]
            emit({"part": "profile", "precision": low_name, "by": key, "top": top})


if __name__ == "__main__":
    main()
