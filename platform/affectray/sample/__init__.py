"""The built-in sample corpus (drawn faces, real-face videos): for the demo, smoke configs and tests."""
