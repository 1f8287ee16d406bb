"""Language-model engines behind one interface (`base.Engine`)."""
