"""Metrics and benchmarks for any saved adapter or merged model: held-out loss/exact match, finance
sentiment, multiple choice (MMLU, medical), math, code (sandboxed), open-ended (LLM judge) and safety.
"""
