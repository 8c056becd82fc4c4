"""The catalog GENERATE loads: subjects, products and styles with their reference images."""
