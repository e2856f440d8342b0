"""Operating deployed models: registry maintenance, re-validation, backups."""
