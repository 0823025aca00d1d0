"""Needle in a haystack: prompts (`prompts`), running the model (`decoding`), scoring
(`scoring`), results and heatmap (`report`), and one whole run (`run`). See docs/EVAL.md."""
