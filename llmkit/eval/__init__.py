"""Evaluation: perplexity, multiple choice, generation metrics, classifiers, explanation, bias, lm-eval."""
