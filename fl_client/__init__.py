"""The Flower ClientApp side of fedyolo: local data, training and evaluation."""
