"""Which Linear/Conv-like layers of real architectures convert, and do the converted ones run?

For every torchvision classification model and a list of timm architectures (random weights,
``pretrained=False``): convert at λ = 1, list the layers left without a converter
(``skipped_layers``), and run the conversion report's probe forward on one 3×H×W input (under
``linear_mode``) to find converted layers that never run (a parent that reads their weights
directly, or a head used only in training). One JSON line per model; the summary on stderr.

    python benchmarks/layer_coverage.py [--family torchvision,timm] [--out results/layer_coverage.jsonl]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# timm architectures with layer types of their own (attention variants, standardized convs,
# re-parameterized blocks, MLP mixers, recurrent mixers); each at its default input size
TIMM = ("resnet50 resnetv2_50x1_bit vit_small_patch16_224 deit_small_patch16_224 deit3_small_patch16_224 "
        "swin_tiny_patch4_window7_224 swinv2_cr_tiny_ns_224 convnext_tiny efficientnet_b0 tf_efficientnet_b0 "
        "mobilenetv3_large_100 mobilenetv4_conv_small mobilenetv4_hybrid_medium regnety_016 regnetz_b16 levit_128 "
        "levit_conv_128 mixer_b16_224 beit_base_patch16_224 beitv2_base_patch16_224 eva02_tiny_patch14_224 "
        "eva02_small_patch14_224 nfnet_f0 dm_nfnet_f0 cait_xxs24_224 xcit_tiny_12_p16_224 poolformer_s12 "
        "edgenext_small maxvit_tiny_tf_224 coatnet_0_rw_224 efficientformer_l1 mobilevit_s crossvit_tiny_240 "
        "pvt_v2_b0 twins_svt_small volo_d1_224 gcvit_tiny convmixer_768_32 inception_v4 dla34 dpn68 "
        "hrnet_w18_small res2net50_26w_4s skresnet18 cspresnet50 ghostnet_100 rexnet_100 vgg16 densenet121 "
        "lambda_resnet26t focalnet_tiny_srf fastvit_t8 repvgg_a0 hgnet_tiny hgnetv2_b0 davit_tiny nest_tiny "
        "tnt_s_patch16_224 sequencer2d_s gmlp_s16_224 resmlp_12_224 convit_tiny pit_ti_224 coat_lite_tiny "
        "mvitv2_tiny efficientvit_b0 efficientvit_m0 tiny_vit_5m_224 hiera_tiny_224 vit_small_patch14_dinov2 "
        "mambaout_femto nextvit_small rdnet_tiny starnet_s1 repghostnet_050 inception_next_tiny "
        "vitamin_small_224 ese_vovnet19b_dw selecsls42b xception41 gernet_s resnest14d cs3darknet_s").split()


def probe(name: str, build, input_size) -> dict:
    import torch

    import robust_surgery as rs
    from robust_surgery.surgery.convert import skipped_layers

    t = time.perf_counter()
    try:
        torch.manual_seed(0)
        model = build().eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = rs.convert(model, lam=1.0)
        missing = [r for r in skipped_layers(net) if r["reason"].startswith("no converter")]
        report = rs.conversion_report(net, input_size)
        idle = [r.name for r in report.layers if r.ran is False]
        row = {"model": name, "converted": len(report.layers), "no_converter": len(missing),
               "no_converter_types": sorted({r["type"] for r in missing}), "idle": len(idle), "idle_names": idle[:8]}
    except Exception as e:  # a model that does not build or run here is recorded, not fatal
        row = {"model": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    row["seconds"] = round(time.perf_counter() - t, 2)
    return row


def models(families: list[str]):
    if "torchvision" in families:
        import torchvision

        for n in torchvision.models.list_models(module=torchvision.models):
            size = (3, 299, 299) if n == "inception_v3" else (3, 224, 224)
            yield f"torchvision:{n}", (lambda n=n: torchvision.models.get_model(n)), size
    if "timm" in families:
        import timm

        for n in TIMM:
            if not timm.is_model(n):
                continue
            cfg = timm.get_pretrained_cfg(n)
            size = tuple(cfg.input_size) if cfg is not None else (3, 224, 224)
            yield f"timm:{n}", (lambda n=n: timm.create_model(n, pretrained=False)), size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="torchvision,timm")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON lines here as well")
    args = ap.parse_args()
    rows = []
    with (args.out.open("w") if args.out else contextlib.nullcontext()) as out:
        for name, build, size in models(args.family.split(",")):
            row = probe(name, build, size)
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if out:
                out.write(line + "\n")
                out.flush()
    ok = [r for r in rows if "error" not in r]
    print(f"{len(rows)} models, {len(ok)} ran: {sum(r['no_converter'] == 0 for r in ok)} with every layer converted, "
          f"{sum(r['idle'] == 0 for r in ok)} with every converted layer run; "
          f"no converter: {sorted({t for r in ok for t in r['no_converter_types']})}; "
          f"idle: {[r['model'] for r in ok if r['idle']]}; errors: {[r['model'] for r in rows if 'error' in r]}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
