pub struct CachingLookup; pub struct LookupConfig;
