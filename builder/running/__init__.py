"""Running a plan: the Ray session and runner, the console, progress, orderly interrupts."""
