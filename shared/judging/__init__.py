"""Pairwise judging shared by the judge service and the trainer's evaluation gate: the
injection-safe prompt, the OpenAI-compatible and offline rubric backends, the both-order
decision rules, the verdict cache and the health statistics."""
