"""The plan: the stage DAG, reuse decisions, spec validation against the teacher, the estimate."""
