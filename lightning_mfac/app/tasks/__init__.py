"""LightningModules: image and sequence classification, causal language modelling."""

from lightning_mfac.app.tasks.classification import ImageClassifier, LanguageModel, SequenceClassifier, Task

__all__ = ["ImageClassifier", "LanguageModel", "SequenceClassifier", "Task"]
