"""A small async application on the same models, with AsyncSession."""
