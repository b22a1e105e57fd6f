"""The service's web page in a real headless Chromium."""
