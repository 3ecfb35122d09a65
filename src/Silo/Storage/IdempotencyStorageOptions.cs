namespace OrleansIdempotency.Silo.Storage;

/// <summary>Options for keeping idempotency records in PostgreSQL.</summary>
public sealed class IdempotencyStorageOptions
{
    /// <summary>The Npgsql connection string. Required.</summary>
    public string ConnectionString { get; set; } = "";

    /// <summary>How often each silo deletes expired records. The default is 5 minutes.</summary>
    public TimeSpan PurgeInterval { get; set; } = TimeSpan.FromMinutes(5);

    /// <summary>How many rows one purge statement deletes at most. The default is 10,000.</summary>
    public int PurgeBatchSize { get; set; } = 10_000;
}
