"""Pure DataFrame -> DataFrame transforms, one module per layer. Nothing here reads or writes storage."""
