"""Sequential studies: boundaries (alpha spending), procedure (looks and decisions), simulate, table."""
