"""What each model stage does: library calls plus tracking, returning values that the stage
writes to its DVC files (the same values go to MLflow). One module per stage."""
