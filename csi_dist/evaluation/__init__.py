"""Evaluation: distributed inference over a split, the CSI metrics, and the report files."""
