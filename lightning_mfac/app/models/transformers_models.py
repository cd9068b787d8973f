"""Small Transformer models built with Hugging Face ``transformers``.

``transformers`` is imported inside the functions so that the rest of the package works
without it installed.
"""

from __future__ import annotations

from torch import nn

__all__ = ["bert_classifier", "gpt_lm"]


def _transformers():
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "the Transformer models need the `transformers` package: pip install transformers"
        ) from err
    return transformers


def bert_classifier(
    num_labels: int = 2,
    pretrained_name: str | None = None,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 30522,
    max_position_embeddings: int = 512,
) -> nn.Module:
    """A BERT sequence classifier.

    With ``pretrained_name`` the checkpoint is loaded with ``from_pretrained`` (hub or local
    directory) and the size arguments are ignored; otherwise a randomly initialised BERT of the
    given size is built offline (the defaults are the BERT-tiny shape).
    """
    tf = _transformers()
    if pretrained_name is not None:
        try:
            return tf.AutoModelForSequenceClassification.from_pretrained(
                pretrained_name, num_labels=num_labels
            )
        except OSError as err:
            raise RuntimeError(
                f"could not load pretrained model {pretrained_name!r} ({err}). Offline, pass a local "
                "directory written by save_pretrained(), or pretrained_name=None for a random init."
            ) from err
    config = tf.BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
    )
    return tf.BertForSequenceClassification(config)


def gpt_lm(
    vocab_size: int, n_embd: int = 128, n_layer: int = 2, n_head: int = 2, n_positions: int = 128
) -> nn.Module:
    """A small GPT-2-style causal language model (random init)."""
    tf = _transformers()
    config = tf.GPT2Config(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=n_positions,
        # GPT-2's special token ids (50256) lie outside a small vocabulary; our corpora have none.
        bos_token_id=None,
        eos_token_id=None,
    )
    return tf.GPT2LMHeadModel(config)
