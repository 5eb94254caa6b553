"""Stages and shared data/tracking code of the memvad harness."""
