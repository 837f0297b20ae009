"""The core, which knows no task: the task interface (`task`), the one fit loop (`fit`, with
`callbacks` and `optim`), checked export writing (`export`), opening artifacts (`artifacts`),
the benchmark table (`benchmark`) and run reports (`report`). Tasks (`tfkarpa.tasks`) build
on it; nothing here imports them."""
