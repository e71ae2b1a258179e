"""Baselines the benchmark compares batcher with."""
