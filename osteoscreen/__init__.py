"""OsteoScreen: osteoporosis screening from spine X-rays (grayscale ImageNet features + Random Forest)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter hides our own messages

__version__ = "0.1.0"
