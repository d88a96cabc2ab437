"""Coordinate check on the command line: tables and a log-log plot (``lowrank.theory.scale``).

    python -m experiments.coord_check --init lora_ga --plot docs/figures/coord_check.png
    python -m experiments.coord_check --init gaussian --widths 64,256,1024 --ranks 4,16 --steps 0,10

Runs the sweep with rsLoRA and with standard scaling and prints, per arm, a markdown table and
the log-log slope of the forward moment against the rank at the largest width (theory for
LoRA-GA's stable scale: 0 with rsLoRA, -1 with standard scaling).
"""

from __future__ import annotations

import argparse
import warnings

from lowrank.theory.scale import format_table, loglog_slope, plot, scale_stability


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", default="lora_ga")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--widths", default="64,128,256,512")
    p.add_argument("--ranks", default="2,4,8,16")
    p.add_argument("--steps", default="0,1,5")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--plot", default=None, help="write the log-log plot here (PNG)")
    args = p.parse_args(argv)
    widths = [int(w) for w in args.widths.split(",")]
    ranks = [int(r) for r in args.ranks.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    by_label = {}
    for scaling in ("rslora", "standard"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="lora_ga is defined with rsLoRA")  # the point of this arm
            rows = scale_stability(args.init, scaling=scaling, alpha=args.alpha, widths=widths, ranks=ranks,
                                   steps=steps, lr=args.lr)
        by_label[f"{args.init} {scaling}"] = rows
        print(f"\n## {args.init}, scaling={scaling} (theory for stable scale + rslora: forward = alpha^2/gamma^2)")
        print(format_table(rows))
        at0 = [r for r in rows if r["step"] == 0 and r["m"] == widths[-1]]
        print(f"log-log slope of forward vs r at m={widths[-1]}: "
              f"{loglog_slope([r['r'] for r in at0], [r['forward'] for r in at0]):+.3f}")
    if args.plot:
        plot(by_label, args.plot)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
