"""The processes: each wires the stages for one command (`watch`, `render`, `status`, `demo`)."""
