"""The shop-around: profiles of every variant per hardware class, and the table and
chart of what one million inferences cost on each."""
