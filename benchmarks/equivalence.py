"""Every model family: is the unit-scaled model the user's model plus scales, with valid gradients?

    python benchmarks/equivalence.py [--families gpt2,llama,...]

For each family of ``tests/fixtures/families.py`` (``FAMILIES`` and ``EXTRA_FAMILIES``, tiny, random init):
``check_equivalence`` (every inserted scale erased, the original's weights; float32) for the family's
loss and for every output (``all_outputs_loss``), and the smallest per-parameter gradient cosine
(``gradient_cosines`` with ``all_outputs_loss``). Prints one row per family.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from unit_scale_fx import unit_scale
from unit_scale_fx.analysis import all_outputs_loss, check_equivalence, gradient_cosines

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from fixtures.families import EXTRA_FAMILIES, FAMILIES, missing  # noqa: E402  (test-only model builders)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="", help="comma-separated names (default: all)")
    args = parser.parse_args()
    table = {**FAMILIES, **EXTRA_FAMILIES}
    names = [n for n in args.families.split(",") if n] or list(table)
    print("| family | capture | equivalent (loss) | equivalent (every output) | max rel. error | min cosine |")
    print("|---|---|---|---|---|---|")
    for name in names:
        fam = table[name]
        if missing(fam.needs):
            print(f"| {name} | skipped: {missing(fam.needs)} | | | | |", flush=True)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = fam.make()
            inputs, kwargs = fam.batch(0)
            us = unit_scale(model, inputs, example_kwargs=kwargs)
            eq_loss = check_equivalence(model, us, *inputs, kwargs=kwargs, loss_fn=fam.loss)
            eq_all = check_equivalence(model, us, *inputs, kwargs=kwargs)
            cos = gradient_cosines(us, *inputs, kwargs=kwargs, loss_fn=all_outputs_loss)
        print(f"| {name} | {us.us_capture} | {eq_loss.ok} | {eq_all.ok} | "
              f"{max(eq_loss.max_error, eq_all.max_error):.1e} | {min(cos.values()):.12f} |", flush=True)


if __name__ == "__main__":
    main()
