using Xunit;

namespace OrleansIdempotency.Testing;

/// <summary>One real PostgreSQL and one real Redis for the test classes of this assembly; each test takes its own database and cluster id.</summary>
public sealed class ServersFixture : IAsyncLifetime
{
    private PostgresServer? postgres;
    private RedisServer? redis;

    public PostgresServer Postgres => postgres ?? throw new InvalidOperationException("PostgreSQL did not start.");

    public RedisServer Redis => redis ?? throw new InvalidOperationException("Redis did not start.");

    public async Task InitializeAsync()
    {
        postgres = await PostgresServer.StartAsync();
        redis = await RedisServer.StartAsync();
    }

    // Whatever started is stopped, also when the other failed to start.
    public async Task DisposeAsync()
    {
        if (redis is not null)
        {
            await redis.DisposeAsync();
        }

        if (postgres is not null)
        {
            await postgres.DisposeAsync();
        }
    }
}
