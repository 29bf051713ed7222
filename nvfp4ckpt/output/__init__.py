"""Writing a checkpoint folder: destination check, lock, journal/resume and the final install."""
