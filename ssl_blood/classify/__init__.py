"""A classifier a lab keeps: labels in (a CSV a person filled), a frozen backbone's features, a
head chosen and calibrated by cross-validation on those labels, saved as one folder with its
model card; `predict` gives every new cell a class, a calibrated probability, an
out-of-distribution score and a review flag, and the slide's differential count."""

from ssl_blood.classify.classifier import Classifier, Prediction
from ssl_blood.classify.labels import LabelTable, apply_labels, read_labels

__all__ = ["Classifier", "LabelTable", "Prediction", "apply_labels", "read_labels"]
