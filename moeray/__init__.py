"""moeray: serve and fine-tune DeepSeek-V3-class Mixture-of-Experts models on Ray."""

__version__ = "0.1.0"
