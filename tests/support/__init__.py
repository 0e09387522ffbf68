"""Helpers shared by the tests: tiny settings, test data, subprocess runners (not tests themselves)."""
