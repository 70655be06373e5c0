"""The sketch's progress bar: products done out of lanczos_num_iters, as the Trainer shows its own bars."""

from __future__ import annotations

import torch
from trainer_utils import run_levy

from hf_levy._progress import counted, sketch_progress


def test_a_refresh_shows_its_products_out_of_the_maximum(tmp_path, capsys):
    # SKETCH asks for 8 products at most, and these sketches use them all (tolerance not reached).
    run_levy(tmp_path, max_steps=1, logging_steps=1, disable_tqdm=False)
    err = capsys.readouterr().err
    assert "Hessian sketch at step 0" in err
    assert "0/8" in err and "8/8" in err


def test_disable_tqdm_hides_the_sketch_bar(tmp_path, capsys):
    run_levy(tmp_path, max_steps=1, logging_steps=1, disable_tqdm=True)
    assert "Hessian sketch" not in capsys.readouterr().err


def test_a_hidden_bar_leaves_the_product_untouched(capsys):
    def matvec(v):
        return 2 * v

    with sketch_progress(False, 8, step=0) as bar:
        assert bar is None and counted(matvec, bar) is matvec
    assert capsys.readouterr().err == ""


def test_a_shown_bar_counts_one_per_product_and_passes_the_product_through(capsys):
    def matvec(v):
        return 2 * v

    with sketch_progress(True, 5, step=3) as bar:
        product = counted(matvec, bar)
        outs = [product(torch.full((2,), float(i))) for i in range(3)]
        assert bar.n == 3 and bar.total == 5
    for i, out in enumerate(outs):
        assert torch.equal(out, torch.full((2,), 2.0 * i))
    assert "Hessian sketch at step 3" in capsys.readouterr().err
