"""Train the shipped reference denoisers and the digits classifier.

    python scripts/train_reference.py dit-digits unet-digits dit-digits-flow classifier
    python scripts/train_reference.py dit-digits-flow-odel dit-digits-flowmap   # from dit-digits-flow

Each run is seeded and resumable: an interrupted run picks up from
``checkpoints/<name>.pt``. Finished EMA weights go to ``diffopt/models/weights``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from diffopt.models.zoo import REFERENCE_MODELS, get_spec, weights_path

CHECKPOINTS = Path("checkpoints")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=[*REFERENCE_MODELS, "classifier"])
    parser.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    CHECKPOINTS.mkdir(exist_ok=True)
    for name in args.names:
        if name == "classifier":
            from diffopt.evaluation.metrics.classifier import CLASSIFIER_WEIGHTS, train_classifier

            classifier = train_classifier()
            save_file(classifier.state_dict(), str(CLASSIFIER_WEIGHTS))
            print(f"saved {CLASSIFIER_WEIGHTS}")
            continue
        from diffopt.evaluation.distillation import train_flow_map
        from diffopt.evaluation.training import train_length_shortcut, train_reference_model

        spec = get_spec(name)
        train = {"dit-length-shortcut": train_length_shortcut, "dit-flow-map": train_flow_map}.get(
            spec.architecture, train_reference_model
        )
        ema = train(spec, CHECKPOINTS / f"{name}.pt", steps=args.steps)
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(weights_path(name)))
        print(f"saved {weights_path(name)}")


if __name__ == "__main__":
    main()
