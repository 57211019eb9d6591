"""Ray actors and tasks: thin wrappers that wire NovaCron's core logic to Ray."""
