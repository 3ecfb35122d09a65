using OrleansIdempotency.Testing;

namespace OrleansIdempotency.Silo.Tests;

[CollectionDefinition(Name)]
public sealed class ServersCollection : ICollectionFixture<ServersFixture>
{
    public const string Name = "servers";
}
