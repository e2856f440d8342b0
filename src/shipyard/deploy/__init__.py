"""Deployment: render one spec to every target, and plan / apply / roll back numbered releases."""
