using Microsoft.Extensions.Configuration;
using OrleansIdempotency.Silo.Hosting;

namespace OrleansIdempotency.Silo.Tests;

public sealed class IdempotencyClusterSettingsTests
{
    private static IdempotencyClusterSettings Read(string name, string value) =>
        IdempotencyClusterSettings.From(new ConfigurationBuilder().AddInMemoryCollection(new Dictionary<string, string?> { [name] = value }).Build());

    [Theory]
    [InlineData("Orleans:Role", "2")]
    [InlineData("Orleans:Role", "Clinet")]
    [InlineData("Orleans:Endpoints:SiloPort", "abc")]
    [InlineData("Orleans:Endpoints:SiloPort", "70000")]
    [InlineData("Orleans:Endpoints:GatewayPort", "-1")]
    [InlineData("Orleans:Endpoints:GatewayPort", "0")]
    public void SettingThatIsNotValid_IsRefused_NamingIt(string name, string value)
    {
        var error = Assert.Throws<InvalidOperationException>(() => Read(name, value));

        Assert.Contains(name, error.Message, StringComparison.Ordinal);
        Assert.Contains($"'{value}'", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Settings_AreReadInAnyCase_AndEmptyOnesKeepTheirDefaults()
    {
        Assert.Equal(IdempotencyClusterRole.Client, Read("Orleans:Role", " client ").Role);
        Assert.Equal(IdempotencyClusterRole.Silo, Read("Orleans:Role", "").Role);
        Assert.Equal(11111, Read("Orleans:Endpoints:SiloPort", "").SiloPort);
        Assert.Equal(12000, Read("Orleans:Endpoints:SiloPort", "12000").SiloPort);
        // Unset is told apart from set: only a silo left to the default is warned of it.
        Assert.Null(Read("Orleans:Endpoints:AdvertisedHost", " ").AdvertisedHost);
        Assert.Equal("silo1", Read("Orleans:Endpoints:AdvertisedHost", "silo1").AdvertisedHost);
    }
}
