"""The causal-LM task (instruction tuning of decoder models): its side of every stage."""
