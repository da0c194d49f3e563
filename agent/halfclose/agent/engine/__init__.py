"""Composition: scan -> classify -> (act), one network namespace at a time."""
