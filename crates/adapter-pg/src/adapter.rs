pub struct PgAdapter; pub struct PgAdapterStats;
