"""Adapter methods: the peft bridge, the method contract, and one file per method."""
