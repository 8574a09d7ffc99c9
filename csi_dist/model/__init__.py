"""The model: the backbone factory with the 6-zone CSI head (factory.py) and the masked weighted loss (loss.py)."""
