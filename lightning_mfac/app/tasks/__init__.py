"""LightningModules: image and sequence classification, causal language modelling."""

from lightning_mfac.app.tasks.classification import ImageClassifier, LanguageModel, SequenceClassifier, Task

#: The tasks a config picks with ``model.task``.
TASKS = {"image": ImageClassifier, "sequence": SequenceClassifier, "language_model": LanguageModel}

__all__ = ["TASKS", "ImageClassifier", "LanguageModel", "SequenceClassifier", "Task"]
