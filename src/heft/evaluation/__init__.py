"""Evaluation: yes/no scoring, multiple choice, generation and answer extraction, statistics, the lm-evaluation-harness bridge."""
