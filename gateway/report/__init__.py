"""Reports: the shop-around (profiles of every variant per hardware class, and the
table and chart of what one million inferences cost on each) and the Markdown tables
every report and bench section writes. Imports no grpc and no generated protobuf."""
