using Npgsql;
using OrleansIdempotency.Silo.Storage;

namespace OrleansIdempotency.Silo.Tests;

public sealed class IdempotencyDatabaseTests
{
    [Fact]
    public async Task UnsetSettings_GetTheLayersDefaults()
    {
        await using var database = new IdempotencyDatabase("Host=127.0.0.1;Username=postgres");

        var settings = new NpgsqlConnectionStringBuilder(database.DataSource.ConnectionString);

        Assert.Equal(IdempotencyDatabase.DefaultTimeoutSeconds, settings.Timeout);
        Assert.Equal(IdempotencyDatabase.DefaultTimeoutSeconds, settings.CommandTimeout);
        Assert.True(settings.Multiplexing);
        Assert.Equal(IdempotencyDatabase.MultiplexedConnections, settings.MaxPoolSize);
        Assert.True(settings.NoResetOnClose);
        Assert.True(settings.MaxAutoPrepare > 0);
    }

    [Fact]
    public async Task SettingsInTheConnectionString_AreKept()
    {
        await using var database = new IdempotencyDatabase(
            "Host=127.0.0.1;Username=postgres;Timeout=9;Command Timeout=11;Multiplexing=false;Max Auto Prepare=0;No Reset On Close=false");

        var settings = new NpgsqlConnectionStringBuilder(database.DataSource.ConnectionString);

        Assert.Equal(9, settings.Timeout);
        Assert.Equal(11, settings.CommandTimeout);
        Assert.False(settings.Multiplexing);
        Assert.Equal(100, settings.MaxPoolSize);
        Assert.Equal(0, settings.MaxAutoPrepare);
        Assert.False(settings.NoResetOnClose);
    }

    [Theory]
    [InlineData("MaxPoolSize=50")]
    [InlineData("Maximum Pool Size=50")]
    public async Task PoolSize_IsKept_HoweverItIsSpelled(string setting)
    {
        await using var database = new IdempotencyDatabase("Host=127.0.0.1;Username=postgres;" + setting);

        Assert.Equal(50, new NpgsqlConnectionStringBuilder(database.DataSource.ConnectionString).MaxPoolSize);
    }

    [Theory]
    [InlineData("Host=127.0.0.1,127.0.0.2")]
    [InlineData("Host=127.0.0.1;Keepalive=30")]
    [InlineData("Host=127.0.0.1;Pooling=false")]
    public async Task StringsNpgsqlCannotMultiplex_AreNotMadeMultiplexed(string given)
    {
        // Npgsql refuses each of these with multiplexing on, when the silo first opens a connection.
        await using var database = new IdempotencyDatabase(given + ";Username=postgres");

        Assert.False(new NpgsqlConnectionStringBuilder(database.DataSource.ConnectionString).Multiplexing);
    }

    [Fact]
    public async Task KeepaliveOff_StillMultiplexes()
    {
        await using var database = new IdempotencyDatabase("Host=127.0.0.1;Username=postgres;Keepalive=0");

        Assert.True(new NpgsqlConnectionStringBuilder(database.DataSource.ConnectionString).Multiplexing);
    }

    [Fact]
    public async Task AMinimumPoolAboveTheLayersMaximum_RaisesTheMaximum()
    {
        await using var database = new IdempotencyDatabase("Host=127.0.0.1;Username=postgres;Minimum Pool Size=20");

        var settings = new NpgsqlConnectionStringBuilder(database.DataSource.ConnectionString);
        Assert.True(settings.Multiplexing);
        Assert.Equal(20, settings.MaxPoolSize);
    }

    [Fact]
    public async Task Maintenance_HasItsOwnSmallUnmultiplexedPool()
    {
        await using var database = new IdempotencyDatabase("Host=127.0.0.1;Username=postgres;Timeout=9");

        var settings = new NpgsqlConnectionStringBuilder(database.MaintenanceDataSource.ConnectionString);

        Assert.False(settings.Multiplexing);
        Assert.Equal(2, settings.MaxPoolSize);
        Assert.Equal(9, settings.Timeout);
    }
}
