"""Distributed tests fork 2-process gloo groups on the CPU (see dist_helpers.run_ranks)."""
